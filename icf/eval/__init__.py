"""icf.eval"""
