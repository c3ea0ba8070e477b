"""Task packages: one per competition, each declaring its spec, stages and phantom."""
