-- Accounts, persons, releases, slots, booking codes, bookings and SMS messages.

CREATE TABLE accounts (
    account_id  text PRIMARY KEY,
    phone       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_phone ON accounts (phone);

CREATE TABLE persons (
    person_id   text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts ON DELETE CASCADE,
    real_name   text NOT NULL,
    id_number   text NOT NULL,
    birth_date  date NOT NULL,
    sex         char(1) NOT NULL CHECK (sex IN ('F', 'M')),
    is_holder   boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, id_number)
);
CREATE INDEX persons_account ON persons (account_id);

CREATE TABLE releases (
    release_id   text PRIMARY KEY,
    vaccine      text NOT NULL,
    dose         integer NOT NULL,
    clinic_id    text NOT NULL,
    department   text NOT NULL,
    opens_at     timestamptz NOT NULL,
    closes_at    timestamptz NOT NULL,
    state        text NOT NULL DEFAULT 'scheduled'
                 CHECK (state IN ('scheduled', 'paused', 'closed')),
    definition   jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (closes_at > opens_at)
);

CREATE TABLE slots (
    release_id  text NOT NULL REFERENCES releases ON DELETE CASCADE,
    slot_id     text NOT NULL,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    capacity    integer NOT NULL CHECK (capacity >= 0),
    PRIMARY KEY (release_id, slot_id)
);

-- Booking codes are a keyed permutation of a global sequence number; each release owns
-- blocks of that sequence, so codes are unique across releases without a cross-slot
-- Redis key.
CREATE SEQUENCE booking_code_seq AS bigint MINVALUE 0 START 0 MAXVALUE 99999999;
CREATE TABLE code_blocks (
    first_seq   bigint PRIMARY KEY,
    size        integer NOT NULL CHECK (size > 0),
    release_id  text NOT NULL REFERENCES releases ON DELETE CASCADE
);

CREATE TABLE bookings (
    claim_id      text PRIMARY KEY,
    code          char(8) NOT NULL UNIQUE,
    release_id    text NOT NULL REFERENCES releases,
    slot_id       text NOT NULL,
    person_id     text NOT NULL,
    account_id    text NOT NULL,
    status        text NOT NULL DEFAULT 'confirmed'
                  CHECK (status IN ('confirmed', 'cancelled', 'attended', 'no_show')),
    claimed_at    timestamptz NOT NULL,
    cancelled_at  timestamptz,
    persisted_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (release_id, slot_id) REFERENCES slots
);
CREATE INDEX bookings_account ON bookings (account_id);
CREATE INDEX bookings_person ON bookings (person_id);
CREATE INDEX bookings_release ON bookings (release_id);

CREATE TABLE sms_messages (
    message_id    bigserial PRIMARY KEY,
    claim_id      text NOT NULL,
    kind          text NOT NULL,
    phone         text NOT NULL,
    body          text NOT NULL,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'sent', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    UNIQUE (claim_id, kind)
);
