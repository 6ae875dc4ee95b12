"""aifab.scheduler"""
