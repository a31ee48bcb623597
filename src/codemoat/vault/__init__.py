"""codemoat.vault"""
