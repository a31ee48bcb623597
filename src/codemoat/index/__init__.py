"""codemoat.index"""
