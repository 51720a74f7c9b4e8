"""Images in: sources in one normal form (`sources`), retrieval splits (`splits`), the view recipe and the
evaluation transform (`transforms`), and torch loaders (`loaders`)."""
