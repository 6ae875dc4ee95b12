"""aifab.cli"""
