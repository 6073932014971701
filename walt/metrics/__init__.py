"""walt.metrics"""
