"""codemoat.serve"""
