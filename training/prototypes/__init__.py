"""Training tools of the prototype families: push (with provenance), pruning, galleries."""
