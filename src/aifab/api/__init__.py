"""aifab.api"""
