"""aifab.control"""
