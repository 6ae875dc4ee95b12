"""aifab.backends"""
