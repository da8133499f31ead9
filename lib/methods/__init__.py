"""One file per published method; ``registry`` maps the names params.yaml uses to them."""
