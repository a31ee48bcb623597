"""codemoat.accounts"""
