"""icf.pipeline"""
