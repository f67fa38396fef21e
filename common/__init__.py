"""What is identical across the method scripts: data, distributed helpers, training plumbing.

Nothing method-specific lives here: augmentation parameters, heads, queues and losses stay in
the method files so that each method reads in one sitting.
"""
