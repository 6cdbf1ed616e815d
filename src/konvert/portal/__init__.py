"""The member portal: server-rendered pages where a member sees their points and reputation,
redeems rewards and manages their data, and a card other sites embed. Entered through a
single-use link that the shop's or forum's backend asks for (POST /v1/members/{id}/portal-sessions)."""
