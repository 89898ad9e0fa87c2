"""Statistics: Hessians and their inverses, each task's statistics, and the cache that keeps
them."""
