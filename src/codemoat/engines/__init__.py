"""codemoat.engines"""
