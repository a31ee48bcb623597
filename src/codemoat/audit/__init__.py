"""codemoat.audit"""
