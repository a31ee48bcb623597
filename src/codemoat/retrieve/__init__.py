"""codemoat.retrieve"""
