"""Delivery status notifications: building NDRs, reading and explaining any NDR."""
