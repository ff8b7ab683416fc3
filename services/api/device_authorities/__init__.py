"""Brands ' factory CAs (bring-your-own CA for device certificates)."""
