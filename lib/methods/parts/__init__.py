"""Building blocks that several method files share (a method file never imports another, so a
training stage depends on exactly one method file: lib.table)."""
