"""Mode tables: a brand's tables, checked against the safety envelope, and the envelope itself."""
