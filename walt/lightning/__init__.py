"""walt.lightning"""
