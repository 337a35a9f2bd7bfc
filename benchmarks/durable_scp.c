/* The floor of a durable C-STORE receiver: what any receiver that answers Success only once
 * an instance's bytes are on disk needs of the processors, the network and the disk, with
 * DCMTK's storescu as the sender (benchmarks/ingest.py compiles and runs it beside
 * `storescp --fork`, with the same ten senders).
 *
 * One thread per association. It accepts every presentation context with its first
 * transfer syntax, appends each data set fragment as it arrives to one preallocated,
 * zero-filled journal file (its pages started on their way to the disk at once), and
 * answers each C-STORE once a flush covers its last fragment: one fdatasync for every
 * association waiting at that moment (group commit). No parsing of the data set, no
 * catalogue, no record of where an instance went (the journal wraps around): nothing a
 * real receiver could do without, and nothing more.
 *
 *     durable_scp PORT JOURNAL_PATH JOURNAL_MIB
 *
 * It prints "ready" once listening, and runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_PDU (256u << 10) /* announced: the node's */
#define PAGE 4096

static int journal_fd;
static uint64_t journal_bytes;
static uint64_t journal_end; /* atomic: bytes reserved, wrapping */

static pthread_mutex_t commit_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t commit_cond = PTHREAD_COND_INITIALIZER;
static uint64_t finished, synced;
static int syncing;

static void group_commit(void) {
    pthread_mutex_lock(&commit_mutex);
    uint64_t ticket = ++finished;
    while (synced < ticket) {
        if (syncing) {
            pthread_cond_wait(&commit_cond, &commit_mutex);
            continue;
        }
        syncing = 1;
        uint64_t target = finished;
        pthread_mutex_unlock(&commit_mutex);
        if (fdatasync(journal_fd) != 0) {
            perror("fdatasync");
            exit(1);
        }
        pthread_mutex_lock(&commit_mutex);
        syncing = 0;
        if (target > synced) synced = target;
        pthread_cond_broadcast(&commit_cond);
    }
    pthread_mutex_unlock(&commit_mutex);
}

static void append(const unsigned char *data, size_t size) {
    uint64_t room = (size + PAGE - 1) / PAGE * PAGE;
    uint64_t at = __atomic_fetch_add(&journal_end, room, __ATOMIC_RELAXED) % journal_bytes;
    if (at + room > journal_bytes) at = 0; /* a floor: wrapping over old bytes costs the same */
    size_t done = 0;
    while (done < size) {
        ssize_t n = pwrite(journal_fd, data + done, size - done, (off_t)(at + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("pwrite");
            exit(1);
        }
        done += (size_t)n;
    }
    sync_file_range(journal_fd, (off_t)at, (off_t)size, SYNC_FILE_RANGE_WRITE);
}

static int read_exact(int fd, unsigned char *into, size_t size) {
    size_t got = 0;
    while (got < size) {
        ssize_t n = recv(fd, into + got, size - got, MSG_WAITALL);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        return -1;
    }
    return 0;
}

static int send_all(int fd, const unsigned char *data, size_t size) {
    size_t sent = 0;
    while (sent < size) {
        ssize_t n = send(fd, data + sent, size - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        sent += (size_t)n;
    }
    return 0;
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v;
}
static void put16(unsigned char *p, uint16_t v) { p[0] = v >> 8, p[1] = v; }
static void le16(unsigned char *p, uint16_t v) { p[0] = v, p[1] = v >> 8; }
static void le32(unsigned char *p, uint32_t v) {
    p[0] = v, p[1] = v >> 8, p[2] = v >> 16, p[3] = v >> 24;
}

/* An A-ASSOCIATE-AC for the request in body[0:length]: every presentation context
 * accepted with its first transfer syntax. */
static size_t associate_ac(const unsigned char *body, size_t length, unsigned char *out) {
    static const char implementation[] = "1.2.826.0.1.3680043.10.1";
    size_t at = 6;
    memcpy(out + at, body, 68); /* version, reserved, called and calling AE titles, reserved */
    at += 68;
    size_t item = 68;
    while (item + 4 <= length) {
        unsigned type = body[item];
        size_t size = be16(body + item + 2);
        const unsigned char *value = body + item + 4;
        if (type == 0x10) { /* application context: echoed */
            memcpy(out + at, body + item, 4 + size);
            at += 4 + size;
        } else if (type == 0x20) { /* presentation context: its first transfer syntax */
            size_t sub = 4;
            while (sub + 4 <= size && value[sub] != 0x40) sub += 4 + be16(value + sub + 2);
            size_t syntax = sub + 4 <= size ? be16(value + sub + 2) : 0;
            out[at] = 0x21, out[at + 1] = 0;
            put16(out + at + 2, (uint16_t)(4 + 4 + syntax));
            out[at + 4] = value[0], out[at + 5] = 0, out[at + 6] = 0, out[at + 7] = 0;
            out[at + 8] = 0x40, out[at + 9] = 0;
            put16(out + at + 10, (uint16_t)syntax);
            memcpy(out + at + 12, value + sub + 4, syntax);
            at += 12 + syntax;
        }
        item += 4 + size;
    }
    size_t implementation_size = sizeof implementation - 1;
    out[at] = 0x50, out[at + 1] = 0;
    put16(out + at + 2, (uint16_t)(8 + 4 + implementation_size));
    out[at + 4] = 0x51, out[at + 5] = 0;
    put16(out + at + 6, 4);
    put32(out + at + 8, MAX_PDU);
    out[at + 12] = 0x52, out[at + 13] = 0;
    put16(out + at + 14, (uint16_t)implementation_size);
    memcpy(out + at + 16, implementation, implementation_size);
    at += 16 + implementation_size;
    out[0] = 0x02, out[1] = 0;
    put32(out + 2, (uint32_t)(at - 6));
    return at;
}

typedef struct {
    uint16_t field, message_id;
    char sop_class[80], sop_instance[80];
    size_t class_size, instance_size;
} Command;

/* The command set's elements a response needs (implicit VR little endian). */
static void parse_command(const unsigned char *data, size_t size, Command *command) {
    size_t at = 0;
    memset(command, 0, sizeof *command);
    while (at + 8 <= size) {
        uint16_t element = (uint16_t)(data[at + 2] | data[at + 3] << 8);
        uint32_t length = data[at + 4] | data[at + 5] << 8 | data[at + 6] << 16 |
                          (uint32_t)data[at + 7] << 24;
        const unsigned char *value = data + at + 8;
        if (at + 8 + length > size) break;
        if (element == 0x0100 && length >= 2) command->field = (uint16_t)(value[0] | value[1] << 8);
        if (element == 0x0110 && length >= 2)
            command->message_id = (uint16_t)(value[0] | value[1] << 8);
        if (element == 0x0002 && length < sizeof command->sop_class) {
            memcpy(command->sop_class, value, length);
            command->class_size = length;
        }
        if (element == 0x1000 && length < sizeof command->sop_instance) {
            memcpy(command->sop_instance, value, length);
            command->instance_size = length;
        }
        at += 8 + length;
    }
}

static size_t element(unsigned char *out, uint16_t tag, const void *value, size_t size) {
    le16(out, 0), le16(out + 2, tag), le32(out + 4, (uint32_t)size);
    memcpy(out + 8, value, size);
    return 8 + size;
}

/* A P-DATA-TF holding the response to ``command`` (C-STORE-RSP or C-ECHO-RSP, Success). */
static size_t response(const Command *command, unsigned context, unsigned char *out) {
    unsigned char set[256];
    size_t at = 12; /* the group length's element, written last */
    unsigned char us[2];
    if (command->class_size) at += element(set + at, 0x0002, command->sop_class, command->class_size);
    le16(us, command->field | 0x8000);
    at += element(set + at, 0x0100, us, 2);
    le16(us, command->message_id);
    at += element(set + at, 0x0120, us, 2);
    le16(us, 0x0101);
    at += element(set + at, 0x0800, us, 2);
    le16(us, 0x0000);
    at += element(set + at, 0x0900, us, 2);
    if (command->instance_size)
        at += element(set + at, 0x1000, command->sop_instance, command->instance_size);
    unsigned char group[4];
    le32(group, (uint32_t)(at - 12));
    element(set, 0x0000, group, 4);
    out[0] = 0x04, out[1] = 0;
    put32(out + 2, (uint32_t)(at + 6));
    put32(out + 6, (uint32_t)(at + 2));
    out[10] = (unsigned char)context, out[11] = 0x03; /* a command, its last fragment */
    memcpy(out + 12, set, at);
    return 12 + at;
}

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    unsigned char *pdu = malloc(MAX_PDU + 6);
    unsigned char command_bytes[4096], out[4096];
    size_t command_size = 0;
    Command command;
    unsigned command_context = 0;
    for (;;) {
        if (read_exact(fd, pdu, 6) != 0) break;
        uint32_t length = be32(pdu + 2);
        if (length > MAX_PDU + 6 || read_exact(fd, pdu + 6, length) != 0) break;
        unsigned type = pdu[0];
        if (type == 0x01) {
            size_t size = associate_ac(pdu + 6, length, out);
            if (send_all(fd, out, size) != 0) break;
        } else if (type == 0x04) {
            size_t at = 6;
            while (at + 6 <= 6 + (size_t)length) {
                uint32_t item = be32(pdu + at);
                unsigned context = pdu[at + 4], header = pdu[at + 5];
                const unsigned char *value = pdu + at + 6;
                size_t size = item - 2;
                if (header & 0x01) { /* a command fragment */
                    if (command_size + size <= sizeof command_bytes) {
                        memcpy(command_bytes + command_size, value, size);
                        command_size += size;
                    }
                    if (header & 0x02) {
                        parse_command(command_bytes, command_size, &command);
                        command_context = context;
                        command_size = 0;
                        if (command.field == 0x0030) { /* C-ECHO */
                            size_t answer = response(&command, context, out);
                            if (send_all(fd, out, answer) != 0) goto done;
                        }
                    }
                } else { /* a data set fragment: into the journal as it arrives */
                    append(value, size);
                    if (header & 0x02) {
                        group_commit();
                        size_t answer = response(&command, command_context, out);
                        if (send_all(fd, out, answer) != 0) goto done;
                    }
                }
                at += 4 + item;
            }
        } else if (type == 0x05) { /* A-RELEASE-RQ */
            unsigned char rp[10] = {0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0};
            send_all(fd, rp, sizeof rp);
            break;
        } else {
            break;
        }
    }
done:
    free(pdu);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT JOURNAL_PATH JOURNAL_MIB\n", argv[0]);
        return 2;
    }
    journal_bytes = (uint64_t)atoll(argv[3]) << 20;
    journal_fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (journal_fd < 0) {
        perror("open");
        return 1;
    }
    static unsigned char zeros[1 << 20];
    for (uint64_t at = 0; at < journal_bytes; at += sizeof zeros) {
        if (pwrite(journal_fd, zeros, sizeof zeros, (off_t)at) != (ssize_t)sizeof zeros) {
            perror("pwrite");
            return 1;
        }
    }
    fsync(journal_fd);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 64) != 0) {
        perror("listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&thread, &attr, serve, (void *)(intptr_t)fd) != 0) close(fd);
        pthread_attr_destroy(&attr);
    }
}
