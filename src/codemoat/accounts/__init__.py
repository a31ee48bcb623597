"""Users, groups and API tokens: who is calling, and what they may read and do."""

from .store import ALL_SCOPES, EVERYONE, Accounts, Principal, TokenInfo

__all__ = ["ALL_SCOPES", "EVERYONE", "Accounts", "Principal", "TokenInfo"]
