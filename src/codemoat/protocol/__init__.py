"""codemoat.protocol"""
