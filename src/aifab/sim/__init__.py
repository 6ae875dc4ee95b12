"""aifab.sim"""
