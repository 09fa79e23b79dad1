"""The fault matrix (docs/operations.md has the table): a real process killed or a resource
taken away in the middle of work, then given back; afterwards, what every acknowledged input,
every draft and every training run must be. Faults that need the whole of `radloop up` live with
the tests that already run it (test_up, test_up_lifecycle, test_cluster); the table names
them."""
