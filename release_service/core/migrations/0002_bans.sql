-- Booking bans after repeated no-shows (the claim path reads them from Redis).
CREATE TABLE bans (
    person_id   text NOT NULL,
    until       timestamptz NOT NULL,
    no_shows    integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (person_id, until)
);
CREATE INDEX bookings_no_show_candidates ON bookings (status, slot_id) WHERE status = 'confirmed';
