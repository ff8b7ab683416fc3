"""Storage upkeep the database cannot schedule itself: rollups, retention, partitions."""
