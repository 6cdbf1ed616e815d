"""The ledger core: accounts, transfers, lots and holds, and the only code that writes them.

Features decide what happens in their pure rules and ask the ledger's Book (book.py) to do it
inside their transaction; the ledger imports no feature.
"""
