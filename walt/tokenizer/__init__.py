"""walt.tokenizer"""
