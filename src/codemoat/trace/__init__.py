"""codemoat.trace"""
