"""walt.conditioning"""
