"""Features to pseudo-labels: the label bank, the label pass, Sinkhorn, k-means, manifold."""
