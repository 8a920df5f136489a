-- Files: uploaded in end-to-end encrypted chunks, kept until every recipient has them
-- (or the retention passes). Chunks are the Fernet tokens the client made, as text.
CREATE TABLE files (
    id         bigserial PRIMARY KEY,
    owner_id   bigint NOT NULL,
    size       bigint NOT NULL,
    chunks     integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE file_chunks (
    file_id bigint NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    idx     integer NOT NULL,
    data    text NOT NULL,
    PRIMARY KEY (file_id, idx)
);

-- Who may download a file and has not finished yet.
CREATE TABLE file_access (
    file_id bigint NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    user_id bigint NOT NULL,
    PRIMARY KEY (file_id, user_id)
);
