"""One file per published method (the module name is the method name, and the recipe name in params.yaml); base.py holds what they share."""
