"""Runtime: the partition runner, cross-step cache policies and parallel groups land here
(see ARCHITECTURE.md, "Why partition at blocks"). Nothing lives here yet."""
