"""walt.diffusion"""
