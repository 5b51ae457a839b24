"""How a person looks inside: the `splice` command line and the demo."""
