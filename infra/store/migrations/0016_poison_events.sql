-- Events a consumer (projector, relay, gateway) could not handle: set aside with their error so
-- that everything after them goes on; /readyz reports them ("degraded").
CREATE TABLE poison_events (
    consumer   text NOT NULL,
    position   bigint NOT NULL,
    event_id   uuid NOT NULL,
    event_type text NOT NULL,
    error      text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
