"""Privacy: a member's export and erasure, across every feature. A layer above the features: it
reads what each one holds on the member for the export, and runs the erasure steps each one
registers (konvert.composition) in one transaction."""
