"""icf.train"""
