"""Graph passes: each edits a gs.Graph in place and returns a PassResult."""
