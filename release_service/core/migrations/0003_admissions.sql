-- Admissions from the waiting rooms of queue-mode releases, persisted from the outbox
-- (event queue.admitted): the durable record of who was admitted, when and in what order.
CREATE TABLE admissions (
    admission_id  text PRIMARY KEY,
    release_id    text NOT NULL REFERENCES releases,
    person_id     text NOT NULL,
    position      bigint NOT NULL,
    admitted_at   timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    persisted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admissions_release_person ON admissions (release_id, person_id);
