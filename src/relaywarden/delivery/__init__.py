"""Delivery: routes, MX lookup, the outbound client, local mailbox delivery."""
