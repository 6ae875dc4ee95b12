"""aifab.client"""
