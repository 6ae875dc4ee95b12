"""aifab.web"""
