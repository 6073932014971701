"""walt.transformer"""
