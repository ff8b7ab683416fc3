"""A brand's notification channels (webhooks) and the deliveries made to them."""
