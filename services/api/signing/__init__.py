"""The public key devices verify mode tables with."""
